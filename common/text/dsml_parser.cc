#include "common/text/dsml_parser.h"

#include <algorithm>
#include <array>
#include <random>

#include <nlohmann/json.hpp>
#include <spdlog/spdlog.h>

#include "common/text/python_json.h"

namespace tandem::text {
namespace {

using Json = nlohmann::ordered_json;

bool IsSpace(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f' || c == '\v'; }

std::string_view Trim(std::string_view text) {
  while (!text.empty() && IsSpace(text.front())) text.remove_prefix(1);
  while (!text.empty() && IsSpace(text.back())) text.remove_suffix(1);
  return text;
}

// Length of the longest tail of `text` that is a proper prefix of one of `patterns`.
template <size_t N>
size_t HeldSuffix(std::string_view text, const std::array<std::string_view, N>& patterns) {
  size_t hold = 0;
  for (const std::string_view pattern : patterns) {
    const size_t longest = std::min(pattern.size() - 1, text.size());
    for (size_t k = longest; k > hold; --k) {
      if (text.substr(text.size() - k) == pattern.substr(0, k)) {
        hold = k;
        break;
      }
    }
  }
  return hold;
}

size_t FirstOf(std::string_view text, std::initializer_list<std::string_view> needles, size_t* which = nullptr) {
  size_t best = std::string_view::npos;
  size_t index = 0;
  for (const std::string_view needle : needles) {
    const size_t pos = text.find(needle);
    if (pos < best) {
      best = pos;
      if (which != nullptr) *which = index;
    }
    ++index;
  }
  return best;
}

enum class Scan { kOk, kIncomplete, kMalformed };

// Cursor over a tag header such as `<｜DSML｜invoke name="x">`; every step may run out of text.
class HeaderReader {
 public:
  HeaderReader(std::string_view text, size_t pos) : text_(text), pos_(pos) {}

  Scan Spaces(bool at_least_one) {
    const size_t start = pos_;
    while (pos_ < text_.size() && IsSpace(text_[pos_])) ++pos_;
    if (pos_ == text_.size()) return Scan::kIncomplete;
    return at_least_one && pos_ == start ? Scan::kMalformed : Scan::kOk;
  }
  Scan Literal(std::string_view literal) {
    for (const char c : literal) {
      if (pos_ == text_.size()) return Scan::kIncomplete;
      if (text_[pos_] != c) return Scan::kMalformed;
      ++pos_;
    }
    return Scan::kOk;
  }
  // `"value"` after the opening quote: one or more non-quote characters, then the quote.
  Scan QuotedRest(std::string& value) {
    const size_t end = text_.find('"', pos_);
    if (end == std::string_view::npos) return Scan::kIncomplete;
    if (end == pos_) return Scan::kMalformed;
    value = std::string(text_.substr(pos_, end - pos_));
    pos_ = end + 1;
    return Scan::kOk;
  }
  std::optional<char> Peek(size_t ahead = 0) const {
    if (pos_ + ahead >= text_.size()) return std::nullopt;
    return text_[pos_ + ahead];
  }
  void Skip(size_t n) { pos_ += n; }
  size_t pos() const { return pos_; }

 private:
  std::string_view text_;
  size_t pos_;
};

#define TANDEM_SCAN(expr)                        \
  do {                                           \
    const Scan scan_result_ = (expr);            \
    if (scan_result_ != Scan::kOk) return scan_result_; \
  } while (0)

struct InvokeHeader {
  std::string name;
  bool self_closing = false;
  size_t end = 0;  // just past the header
};

// `<｜DSML｜invoke\s+name="N"\s*(/>|>)` at `pos`.
Scan ReadInvokeHeader(std::string_view text, size_t pos, InvokeHeader& header) {
  HeaderReader reader(text, pos + dsml::kInvokeStart.size());
  TANDEM_SCAN(reader.Spaces(true));
  TANDEM_SCAN(reader.Literal("name=\""));
  TANDEM_SCAN(reader.QuotedRest(header.name));
  TANDEM_SCAN(reader.Spaces(false));
  if (reader.Peek() == '>') {
    header.end = reader.pos() + 1;
    return Scan::kOk;
  }
  if (reader.Peek() != '/') return Scan::kMalformed;
  if (!reader.Peek(1).has_value()) return Scan::kIncomplete;
  if (reader.Peek(1) != '>') return Scan::kMalformed;
  header.self_closing = true;
  header.end = reader.pos() + 2;
  return Scan::kOk;
}

struct ParameterHeader {
  std::string name;
  std::string string_flag;
  size_t end = 0;
};

// `<｜DSML｜parameter\s+name="N"\s+string="S"\s*>` at `pos`.
Scan ReadParameterHeader(std::string_view text, size_t pos, ParameterHeader& header) {
  HeaderReader reader(text, pos + dsml::kParameterStart.size());
  TANDEM_SCAN(reader.Spaces(true));
  TANDEM_SCAN(reader.Literal("name=\""));
  TANDEM_SCAN(reader.QuotedRest(header.name));
  TANDEM_SCAN(reader.Spaces(true));
  TANDEM_SCAN(reader.Literal("string=\""));
  TANDEM_SCAN(reader.QuotedRest(header.string_flag));
  TANDEM_SCAN(reader.Spaces(false));
  TANDEM_SCAN(reader.Literal(">"));
  header.end = reader.pos();
  return Scan::kOk;
}

Json TypedValue(std::string_view raw, bool is_string) {
  const std::string_view value = Trim(raw);
  if (is_string) return Json(std::string(value));
  Json parsed = Json::parse(value, nullptr, /*allow_exceptions=*/false);
  if (parsed.is_discarded()) return Json(std::string(value));
  return parsed;
}

// The arguments JSON of an invoke body (§2.2). For an unfinished body: a prefix of what the
// finished body will give — complete parameters plus the text so far of a string parameter.
std::string ArgumentsFromBody(std::string_view body, bool complete) {
  // A JSON-object body is passed through as written (even when malformed: what was streamed stays
  // a prefix of the result).
  const std::string_view trimmed = Trim(body);
  if (!trimmed.empty() && trimmed.front() == '{') return std::string(trimmed);
  // Entries are written in the order they appear. A repeated name is written again rather than
  // replacing the earlier value: JSON readers keep the last one (the "last wins" rule) and the
  // streamed text stays a prefix of the final text.
  std::string entries;
  std::optional<std::pair<std::string, std::string_view>> partial_string;
  size_t pos = 0;
  while (true) {
    const size_t start = body.find(dsml::kParameterStart, pos);
    if (start == std::string_view::npos) break;
    ParameterHeader header;
    const Scan scan = ReadParameterHeader(body, start, header);
    if (scan == Scan::kIncomplete) break;
    if (scan == Scan::kMalformed) {
      pos = start + dsml::kParameterStart.size();
      continue;
    }
    const bool is_string = header.string_flag == "true";
    size_t end = body.find(dsml::kParameterEnd, header.end);
    if (end == std::string_view::npos) {
      if (!complete) {
        if (is_string) partial_string.emplace(header.name, body.substr(header.end));
        break;
      }
      end = body.size();  // the invoke closed first: the value runs to its end
    }
    entries.append(entries.empty() ? "{" : ", ");
    entries.append(PythonJsonDumps(Json(header.name))).append(": ");
    entries.append(PythonJsonDumps(TypedValue(body.substr(header.end, end - header.end), is_string)));
    pos = std::min(body.size(), end + dsml::kParameterEnd.size());
  }
  if (complete) return entries.empty() ? "{}" : entries + "}";
  if (partial_string.has_value()) {
    entries.append(entries.empty() ? "{" : ", ");
    entries.append(PythonJsonDumps(Json(partial_string->first))).append(": ");
    std::string value = PythonJsonDumps(Json(std::string(Trim(partial_string->second))));
    value.pop_back();  // the closing quote: the value may still grow
    entries.append(value);
  }
  return entries;
}

constexpr std::array<std::string_view, 6> kContentHolds = {
    dsml::kSectionStart, dsml::kInvokeStart, "\n\n<｜DSML｜tool_calls>", "\n\n<｜DSML｜invoke",
    dsml::kSectionEnd, dsml::kInvokeEnd};
constexpr std::array<std::string_view, 4> kBodyHolds = {dsml::kInvokeEnd, dsml::kSectionEnd, dsml::kInvokeStart,
                                                        dsml::kParameterEnd};

}  // namespace

DsmlToolParser::DsmlToolParser(ToolNames tool_names) : tool_names_(std::move(tool_names)) {}

void DsmlToolParser::EmitContent(ToolStreamUpdate& update, std::string_view text) {
  // Literal closing tags never reach content.
  while (!text.empty()) {
    size_t which = 0;
    const size_t pos = FirstOf(text, {dsml::kSectionEnd, dsml::kInvokeEnd}, &which);
    if (pos == std::string_view::npos) {
      update.content.append(text);
      return;
    }
    update.content.append(text.substr(0, pos));
    text.remove_prefix(pos + (which == 0 ? dsml::kSectionEnd.size() : dsml::kInvokeEnd.size()));
  }
}

ToolStreamUpdate DsmlToolParser::Push(std::string_view chunk) {
  ToolStreamUpdate update;
  if (finished_) return update;
  buffer_.append(chunk);
  if (!in_tools_) {
    const size_t marker = FirstOf(buffer_, {dsml::kSectionStart, dsml::kInvokeStart});
    if (marker == std::string::npos) {
      const size_t hold = HeldSuffix(buffer_, kContentHolds);
      EmitContent(update, std::string_view(buffer_).substr(0, buffer_.size() - hold));
      buffer_.erase(0, buffer_.size() - hold);
      return update;
    }
    std::string_view before = std::string_view(buffer_).substr(0, marker);
    if (before.size() >= 2 && before.substr(before.size() - 2) == "\n\n") {
      separator_ = "\n\n";
      before.remove_suffix(2);
    }
    EmitContent(update, before);
    buffer_.erase(0, marker);
    in_tools_ = true;
  }
  ScanInvokes(update);
  return update;
}

void DsmlToolParser::EmitArguments(ToolStreamUpdate& update, const std::string& arguments, bool complete) {
  if (invoke_skipped_) return;
  ToolCall& call = calls_.back();
  const int index = static_cast<int>(calls_.size()) - 1;
  std::string delta;
  if (arguments.compare(0, sent_arguments_.size(), sent_arguments_) == 0) {
    delta = arguments.substr(sent_arguments_.size());
  } else if (complete) {
    spdlog::warn("tool call {}: final arguments do not extend the streamed prefix", call.name);
  }
  if (!delta.empty()) {
    sent_arguments_.append(delta);
    update.calls.push_back({index, std::nullopt, delta});
  }
  call.arguments = complete ? arguments : sent_arguments_;
  call.complete = complete;
}

void DsmlToolParser::ScanInvokes(ToolStreamUpdate& update) {
  // Text cut from the buffer is kept while no call has parsed, to give it back as content.
  auto consume = [&](size_t n) {
    if (calls_.empty()) consumed_.append(buffer_, 0, n);
    buffer_.erase(0, n);
  };
  while (true) {
    if (!invoke_open_) {
      const size_t start = buffer_.find(dsml::kInvokeStart);
      if (start == std::string::npos) {
        // Text between calls is never content; keep only what may start the next invoke.
        consume(buffer_.size() - HeldSuffix(buffer_, std::array<std::string_view, 1>{dsml::kInvokeStart}));
        return;
      }
      InvokeHeader header;
      const Scan scan = ReadInvokeHeader(buffer_, start, header);
      if (scan == Scan::kIncomplete) return;
      if (scan == Scan::kMalformed) {
        consume(start + dsml::kInvokeStart.size());
        continue;
      }
      const std::string name(Trim(header.name));
      invoke_skipped_ = name.empty() || (tool_names_.has_value() && !tool_names_->contains(name));
      if (invoke_skipped_) {
        spdlog::warn("tool call to unknown tool \"{}\" dropped", name);
      } else {
        update.calls.push_back({static_cast<int>(calls_.size()), name, ""});
        calls_.push_back({name, "", false});
      }
      consume(header.end);
      invoke_open_ = true;
      sent_arguments_.clear();
      if (header.self_closing) {
        EmitArguments(update, "{}", true);
        invoke_open_ = false;
      }
      continue;
    }
    size_t which = 0;
    const size_t end = FirstOf(buffer_, {dsml::kInvokeEnd, dsml::kSectionEnd, dsml::kInvokeStart}, &which);
    if (end != std::string::npos) {
      EmitArguments(update, ArgumentsFromBody(std::string_view(buffer_).substr(0, end), true), true);
      consume(which == 0 ? end + dsml::kInvokeEnd.size() : end);
      invoke_open_ = false;
      continue;
    }
    const size_t hold = HeldSuffix(buffer_, kBodyHolds);
    EmitArguments(update, ArgumentsFromBody(std::string_view(buffer_).substr(0, buffer_.size() - hold), false),
                  false);
    return;
  }
}

ToolStreamUpdate DsmlToolParser::Finish() {
  ToolStreamUpdate update;
  if (finished_) return update;
  finished_ = true;
  if (!in_tools_) {
    EmitContent(update, buffer_);
    buffer_.clear();
    return update;
  }
  ScanInvokes(update);
  if (calls_.empty()) {
    // Nothing parsed: the markup was not a tool call after all, so it is content.
    EmitContent(update, separator_ + consumed_ + buffer_);
  }
  buffer_.clear();
  return update;
}

ToolParseResult ParseDsmlToolCalls(std::string_view text, ToolNames tool_names) {
  DsmlToolParser parser(std::move(tool_names));
  ToolParseResult result;
  result.content = parser.Push(text).content;
  result.content.append(parser.Finish().content);
  result.calls = parser.calls();
  return result;
}

bool HasDsmlToolCall(std::string_view text) {
  return text.find(dsml::kSectionStart) != std::string_view::npos ||
         text.find(dsml::kInvokeStart) != std::string_view::npos;
}

std::string NewToolCallId() {
  thread_local std::mt19937_64 generator{std::random_device{}()};
  static constexpr char kHex[] = "0123456789abcdef";
  std::string id = "call_";
  for (int i = 0; i < 24; ++i) id.push_back(kHex[generator() % 16]);
  return id;
}

}  // namespace tandem::text
