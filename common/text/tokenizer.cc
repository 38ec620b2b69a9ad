#include "common/text/tokenizer.h"

#include <algorithm>
#include <array>
#include <climits>
#include <fstream>
#include <mutex>
#include <queue>
#include <shared_mutex>
#include <sstream>

#include <nlohmann/json.hpp>

#include "absl/container/flat_hash_map.h"
#include "common/text/byte_level.h"
#include "common/text/pretokenizer.h"
#include "common/text/utf8.h"

namespace tandem::text {
namespace {

constexpr TokenId kNoToken = -1;
// Pieces up to this many bytes are merged with the simple quadratic loop; longer ones use a heap.
constexpr size_t kHeapMergeThreshold = 128;
constexpr size_t kCacheCapacity = 65536;
constexpr size_t kCacheMaxPieceBytes = 256;

struct Merge {
  int32_t rank;
  TokenId merged;
};

// Debian's Abseil has its own string_view type; convert for heterogeneous lookups.
absl::string_view AbslView(std::string_view view) { return absl::string_view(view.data(), view.size()); }

uint64_t PairKey(TokenId left, TokenId right) {
  return (static_cast<uint64_t>(static_cast<uint32_t>(left)) << 32) | static_cast<uint32_t>(right);
}

bool IsWhiteSpace(char32_t cp) {
  return (cp >= 0x09 && cp <= 0x0D) || cp == 0x20 || cp == 0x85 || cp == 0xA0 || cp == 0x1680 ||
         (cp >= 0x2000 && cp <= 0x200A) || cp == 0x2028 || cp == 0x2029 || cp == 0x202F ||
         cp == 0x205F || cp == 0x3000;
}

// single_word: HF tests Unicode alphanumerics; any non-ASCII byte is taken as part of a word here.
bool IsWordByte(char c) {
  return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_' ||
         (static_cast<unsigned char>(c) >= 0x80);  // non-ASCII counts as a word character
}

absl::StatusOr<std::string> ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat(path, ": cannot open"));
  std::ostringstream buffer;
  buffer << in.rdbuf();
  return buffer.str();
}

// Leftmost-longest matching of a fixed set of strings (HF uses Aho-Corasick with that mode).
class AddedTokenMatcher {
 public:
  struct Match {
    size_t begin;
    size_t end;
    size_t token;  // index into the token list the matcher was built from
  };

  void Add(std::string_view content, size_t token) {
    if (content.empty()) return;
    int32_t node = 0;
    for (const char c : content) {
      const auto byte = static_cast<uint8_t>(c);
      auto& children = nodes_[node].children;
      auto it = std::lower_bound(children.begin(), children.end(), byte,
                                 [](const auto& child, uint8_t b) { return child.first < b; });
      if (it != children.end() && it->first == byte) {
        node = it->second;
      } else {
        const auto next = static_cast<int32_t>(nodes_.size());
        children.insert(it, {byte, next});
        nodes_.emplace_back();
        node = next;
      }
    }
    nodes_[node].token = static_cast<int64_t>(token);
    first_byte_[static_cast<uint8_t>(content[0])] = true;
    empty_ = false;
  }

  std::vector<Match> FindAll(std::string_view text) const {
    std::vector<Match> matches;
    if (empty_) return matches;
    size_t pos = 0;
    while (pos < text.size()) {
      if (!first_byte_[static_cast<uint8_t>(text[pos])]) {
        ++pos;
        continue;
      }
      int32_t node = 0;
      int64_t best_token = -1;
      size_t best_end = 0;
      for (size_t i = pos; i < text.size(); ++i) {
        const auto& children = nodes_[node].children;
        const auto byte = static_cast<uint8_t>(text[i]);
        auto it = std::lower_bound(children.begin(), children.end(), byte,
                                   [](const auto& child, uint8_t b) { return child.first < b; });
        if (it == children.end() || it->first != byte) break;
        node = it->second;
        if (nodes_[node].token >= 0) {
          best_token = nodes_[node].token;
          best_end = i + 1;
        }
      }
      if (best_token >= 0) {
        matches.push_back({pos, best_end, static_cast<size_t>(best_token)});
        pos = best_end;
      } else {
        ++pos;
      }
    }
    return matches;
  }

 private:
  struct Node {
    std::vector<std::pair<uint8_t, int32_t>> children;
    int64_t token = -1;
  };
  std::vector<Node> nodes_ = std::vector<Node>(1);
  std::array<bool, 256> first_byte_{};
  bool empty_ = true;
};

// A stretch of input: either an added token already recognised, or text still to tokenize.
struct Segment {
  size_t begin;
  size_t end;
  TokenId token;  // kNoToken for plain text
};

}  // namespace

struct Tokenizer::Impl {
  PreTokenizer pre_tokenizer;
  std::array<TokenId, 256> byte_token{};
  absl::flat_hash_map<uint64_t, Merge> merges;
  absl::flat_hash_map<std::string, TokenId> vocab;  // vocabulary string form → id
  bool ignore_merges = false;

  // Per id (vocabulary and added tokens).
  std::vector<std::string> id_string;
  std::vector<std::string> id_bytes;
  std::vector<uint8_t> id_known;
  std::vector<uint8_t> id_special;

  std::vector<AddedToken> added;
  absl::flat_hash_map<std::string, TokenId> added_ids;  // content → id (the first entry wins)
  AddedTokenMatcher raw_matcher;         // non-normalized added tokens (matched first)
  AddedTokenMatcher normalized_matcher;  // normalized ones (matched in what is left)
  std::vector<size_t> raw_tokens;        // matcher token index → index into `added`
  std::vector<size_t> normalized_tokens;

  mutable std::shared_mutex cache_mutex;
  mutable absl::flat_hash_map<std::string, std::vector<TokenId>> cache;

  void SetId(TokenId id, const std::string& str) {
    const auto index = static_cast<size_t>(id);
    if (index >= id_string.size()) {
      id_string.resize(index + 1);
      id_bytes.resize(index + 1);
      id_known.resize(index + 1, 0);
      id_special.resize(index + 1, 0);
    }
    id_string[index] = str;
    id_bytes[index] = TokenStringToBytes(str);
    id_known[index] = 1;
  }

  // Splits `text` around matches of one matcher, keeping earlier segments that are tokens already.
  void SplitAdded(std::string_view text, const AddedTokenMatcher& matcher,
                  const std::vector<size_t>& token_index, std::vector<Segment>& segments) const {
    std::vector<Segment> out;
    out.reserve(segments.size());
    for (const Segment& segment : segments) {
      if (segment.token != kNoToken) {
        out.push_back(segment);
        continue;
      }
      const std::string_view piece = text.substr(segment.begin, segment.end - segment.begin);
      size_t start_offset = 0;
      for (const auto& match : matcher.FindAll(piece)) {
        const AddedToken& token = added[token_index[match.token]];
        size_t start = match.begin;
        size_t stop = match.end;
        if (token.single_word) {
          const bool start_ok = start == 0 || !IsWordByte(piece[start - 1]);
          const bool stop_ok = stop == piece.size() || !IsWordByte(piece[stop]);
          if (!start_ok || !stop_ok) continue;
        }
        if (token.lstrip) {
          size_t new_start = start;
          while (new_start > 0) {
            size_t lead = new_start - 1;
            while (lead > 0 && (static_cast<unsigned char>(piece[lead]) & 0xC0) == 0x80) --lead;
            size_t cursor = lead;
            if (!IsWhiteSpace(NextCodePoint(piece, cursor))) break;
            new_start = lead;
          }
          start = std::max(new_start, start_offset);
        }
        if (token.rstrip) {
          size_t cursor = stop;
          while (cursor < piece.size()) {
            size_t next = cursor;
            if (!IsWhiteSpace(NextCodePoint(piece, next))) break;
            cursor = next;
          }
          stop = cursor;
        }
        if (start_offset < start) {
          out.push_back({segment.begin + start_offset, segment.begin + start, kNoToken});
        }
        out.push_back({segment.begin + start, segment.begin + stop, token.id});
        start_offset = stop;
      }
      if (start_offset < piece.size()) out.push_back({segment.begin + start_offset, segment.end, kNoToken});
    }
    segments.swap(out);
  }

  void MergeSmall(std::vector<TokenId>& symbols) const {
    std::vector<int32_t> ranks(symbols.size(), INT32_MAX);
    std::vector<TokenId> merged(symbols.size(), kNoToken);
    auto rate = [&](size_t i) {
      const auto it = merges.find(PairKey(symbols[i], symbols[i + 1]));
      ranks[i] = it == merges.end() ? INT32_MAX : it->second.rank;
      merged[i] = it == merges.end() ? kNoToken : it->second.merged;
    };
    for (size_t i = 0; i + 1 < symbols.size(); ++i) rate(i);
    while (symbols.size() > 1) {
      size_t best = 0;
      int32_t best_rank = INT32_MAX;
      for (size_t i = 0; i + 1 < symbols.size(); ++i) {
        if (ranks[i] < best_rank) {
          best_rank = ranks[i];
          best = i;
        }
      }
      if (best_rank == INT32_MAX) break;
      symbols[best] = merged[best];
      symbols.erase(symbols.begin() + static_cast<ptrdiff_t>(best) + 1);
      ranks.erase(ranks.begin() + static_cast<ptrdiff_t>(best) + 1);
      merged.erase(merged.begin() + static_cast<ptrdiff_t>(best) + 1);
      if (best + 1 < symbols.size()) {
        rate(best);
      } else {
        ranks[best] = INT32_MAX;
      }
      if (best > 0) rate(best - 1);
    }
  }

  // Same result as MergeSmall in O(n log n): a heap of candidate pairs over a linked list.
  void MergeLarge(std::vector<TokenId>& symbols) const {
    const size_t n = symbols.size();
    std::vector<int64_t> prev(n);
    std::vector<int64_t> next(n);
    for (size_t i = 0; i < n; ++i) {
      prev[i] = static_cast<int64_t>(i) - 1;
      next[i] = i + 1 < n ? static_cast<int64_t>(i + 1) : -1;
    }
    struct Candidate {
      int32_t rank;
      int64_t pos;
      TokenId left;
      TokenId right;
      bool operator>(const Candidate& other) const {
        return rank != other.rank ? rank > other.rank : pos > other.pos;
      }
    };
    std::priority_queue<Candidate, std::vector<Candidate>, std::greater<>> queue;
    auto push = [&](int64_t pos) {
      if (pos < 0 || next[pos] < 0) return;
      const TokenId left = symbols[pos];
      const TokenId right = symbols[next[pos]];
      const auto it = merges.find(PairKey(left, right));
      if (it != merges.end()) queue.push({it->second.rank, pos, left, right});
    };
    for (size_t i = 0; i + 1 < n; ++i) push(static_cast<int64_t>(i));
    std::vector<uint8_t> alive(n, 1);
    while (!queue.empty()) {
      const Candidate top = queue.top();
      queue.pop();
      const int64_t pos = top.pos;
      if (!alive[pos] || symbols[pos] != top.left || next[pos] < 0) continue;
      const int64_t right = next[pos];
      if (symbols[right] != top.right) continue;
      symbols[pos] = merges.find(PairKey(top.left, top.right))->second.merged;
      alive[right] = 0;
      next[pos] = next[right];
      if (next[right] >= 0) prev[next[right]] = pos;
      push(prev[pos]);
      push(pos);
    }
    std::vector<TokenId> result;
    for (int64_t i = 0; i >= 0; i = next[i]) result.push_back(symbols[i]);
    symbols.swap(result);
  }

  void EncodePiece(std::string_view piece, std::vector<TokenId>& out) const {
    const bool cacheable = piece.size() <= kCacheMaxPieceBytes;
    if (cacheable) {
      std::shared_lock lock(cache_mutex, std::try_to_lock);
      if (lock.owns_lock()) {
        const auto it = cache.find(AbslView(piece));
        if (it != cache.end()) {
          out.insert(out.end(), it->second.begin(), it->second.end());
          return;
        }
      }
    }
    std::vector<TokenId> symbols;
    if (ignore_merges) {
      const auto it = vocab.find(BytesToTokenString(piece));
      if (it != vocab.end()) symbols.push_back(it->second);
    }
    if (symbols.empty()) {
      symbols.reserve(piece.size());
      for (const char c : piece) {
        const TokenId id = byte_token[static_cast<uint8_t>(c)];
        if (id != kNoToken) symbols.push_back(id);  // no unk token: HF drops the byte
      }
      if (symbols.size() <= kHeapMergeThreshold) {
        MergeSmall(symbols);
      } else {
        MergeLarge(symbols);
      }
    }
    out.insert(out.end(), symbols.begin(), symbols.end());
    if (cacheable) {
      std::unique_lock lock(cache_mutex, std::try_to_lock);
      if (lock.owns_lock() && cache.size() < kCacheCapacity) cache.emplace(piece, std::move(symbols));
    }
  }
};

Tokenizer::Tokenizer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Tokenizer::~Tokenizer() = default;

absl::StatusOr<std::unique_ptr<Tokenizer>> Tokenizer::Load(const std::string& dir) {
  TANDEM_ASSIGN_OR_RETURN(std::string tokenizer_json, ReadFile(dir + "/tokenizer.json"));
  std::string config_json;
  auto config = ReadFile(dir + "/tokenizer_config.json");
  if (config.ok()) config_json = std::move(config).value();
  auto tokenizer = FromJsonText(tokenizer_json, config_json);
  if (!tokenizer.ok()) {
    return absl::Status(tokenizer.status().code(),
                        absl::StrCat("model dir ", dir, ": ", tokenizer.status().message()));
  }
  return tokenizer;
}

absl::StatusOr<std::unique_ptr<Tokenizer>> Tokenizer::FromJsonText(std::string_view tokenizer_json,
                                                                   std::string_view config_json) {
  const nlohmann::json root = nlohmann::json::parse(tokenizer_json, nullptr, /*allow_exceptions=*/false);
  if (root.is_discarded() || !root.is_object()) {
    return absl::InvalidArgumentError("tokenizer.json: not a JSON object");
  }
  auto impl = std::make_unique<Impl>();

  const nlohmann::json normalizer = root.value("normalizer", nlohmann::json());
  const bool identity_normalizer =
      normalizer.is_null() || (normalizer.value("type", "") == "Sequence" &&
                               normalizer.value("normalizers", nlohmann::json::array()).empty());
  if (!identity_normalizer) {
    return absl::UnimplementedError("tokenizer.json: only an empty normalizer is supported");
  }
  const nlohmann::json decoder = root.value("decoder", nlohmann::json());
  if (!decoder.is_null() && decoder.value("type", "") != "ByteLevel") {
    return absl::UnimplementedError("tokenizer.json: only the ByteLevel decoder is supported");
  }
  TANDEM_ASSIGN_OR_RETURN(impl->pre_tokenizer,
                          PreTokenizer::FromJson(root.value("pre_tokenizer", nlohmann::json())));

  const nlohmann::json model = root.value("model", nlohmann::json());
  if (model.value("type", "") != "BPE") return absl::UnimplementedError("tokenizer.json: model is not BPE");
  if (model.value("byte_fallback", false) || !model.value("dropout", nlohmann::json()).is_null() ||
      !model.value("continuing_subword_prefix", nlohmann::json()).is_null() ||
      !model.value("end_of_word_suffix", nlohmann::json()).is_null()) {
    return absl::UnimplementedError(
        "tokenizer.json: BPE byte_fallback/dropout/subword prefix or suffix are not supported");
  }
  impl->ignore_merges = model.value("ignore_merges", false);
  if (!model.contains("vocab") || !model["vocab"].is_object()) {
    return absl::InvalidArgumentError("tokenizer.json: model.vocab missing");
  }
  for (const auto& [token, id] : model["vocab"].items()) {
    if (!id.is_number_integer() || id.get<int64_t>() < 0 || id.get<int64_t>() > INT32_MAX / 2) {
      return absl::InvalidArgumentError(absl::StrCat("tokenizer.json: bad id for token ", token));
    }
    impl->vocab.emplace(token, id.get<TokenId>());
    impl->SetId(id.get<TokenId>(), token);
  }
  impl->byte_token.fill(kNoToken);
  for (int b = 0; b < 256; ++b) {
    std::string single;
    AppendCodePoint(single, ByteToChar(static_cast<uint8_t>(b)));
    const auto it = impl->vocab.find(single);
    if (it != impl->vocab.end()) impl->byte_token[b] = it->second;
  }
  const nlohmann::json merges = model.value("merges", nlohmann::json::array());
  int32_t rank = 0;
  for (const auto& merge : merges) {
    std::string left;
    std::string right;
    if (merge.is_string()) {
      const std::string line = merge.get<std::string>();
      const size_t space = line.find(' ');
      if (space == std::string::npos || line.find(' ', space + 1) != std::string::npos) {
        return absl::InvalidArgumentError(absl::StrCat("tokenizer.json: bad merge \"", line, "\""));
      }
      left = line.substr(0, space);
      right = line.substr(space + 1);
    } else if (merge.is_array() && merge.size() == 2 && merge[0].is_string() && merge[1].is_string()) {
      left = merge[0].get<std::string>();
      right = merge[1].get<std::string>();
    } else {
      return absl::InvalidArgumentError("tokenizer.json: a merge is neither \"a b\" nor [a, b]");
    }
    const auto left_it = impl->vocab.find(left);
    const auto right_it = impl->vocab.find(right);
    const auto merged_it = impl->vocab.find(left + right);
    if (left_it == impl->vocab.end() || right_it == impl->vocab.end() || merged_it == impl->vocab.end()) {
      return absl::InvalidArgumentError(
          absl::StrCat("tokenizer.json: merge \"", left, " ", right, "\" uses a token outside the vocab"));
    }
    impl->merges.try_emplace(PairKey(left_it->second, right_it->second), Merge{rank, merged_it->second});
    ++rank;
  }

  for (const auto& entry : root.value("added_tokens", nlohmann::json::array())) {
    if (!entry.is_object() || !entry.contains("id") || !entry["id"].is_number_integer() ||
        !entry.contains("content") || !entry["content"].is_string()) {
      return absl::InvalidArgumentError("tokenizer.json: malformed added_tokens entry");
    }
    AddedToken token;
    token.id = entry["id"].get<TokenId>();
    if (token.id < 0 || token.id > INT32_MAX / 2) {
      return absl::InvalidArgumentError("tokenizer.json: added token id out of range");
    }
    token.content = entry["content"].get<std::string>();
    token.special = entry.value("special", false);
    token.normalized = entry.value("normalized", !token.special);
    token.lstrip = entry.value("lstrip", false);
    token.rstrip = entry.value("rstrip", false);
    token.single_word = entry.value("single_word", false);
    impl->SetId(token.id, token.content);
    impl->added_ids.emplace(token.content, token.id);
    impl->added.push_back(std::move(token));
  }
  absl::flat_hash_map<std::string, bool> special_contents;
  for (size_t i = 0; i < impl->added.size(); ++i) {
    const AddedToken& token = impl->added[i];
    if (token.special) special_contents[token.content] = true;
    if (token.normalized) {
      impl->normalized_matcher.Add(token.content, impl->normalized_tokens.size());
      impl->normalized_tokens.push_back(i);
    } else {
      impl->raw_matcher.Add(token.content, impl->raw_tokens.size());
      impl->raw_tokens.push_back(i);
    }
  }
  // HF decides "special" by the token's string, so a vocab entry equal to a special token counts too.
  for (size_t id = 0; id < impl->id_string.size(); ++id) {
    if (impl->id_known[id] && special_contents.contains(impl->id_string[id])) impl->id_special[id] = 1;
  }

  auto tokenizer = std::unique_ptr<Tokenizer>(new Tokenizer(std::move(impl)));
  if (!config_json.empty()) {
    const nlohmann::json config = nlohmann::json::parse(config_json, nullptr, false);
    if (config.is_discarded() || !config.is_object()) {
      return absl::InvalidArgumentError("tokenizer_config.json: not a JSON object");
    }
    auto token_of = [&](const char* key) -> std::optional<TokenId> {
      if (!config.contains(key)) return std::nullopt;
      const nlohmann::json& value = config[key];
      std::string content;
      if (value.is_string()) {
        content = value.get<std::string>();
      } else if (value.is_object() && value.contains("content") && value["content"].is_string()) {
        content = value["content"].get<std::string>();
      } else {
        return std::nullopt;
      }
      return tokenizer->TokenToId(content);
    };
    tokenizer->bos_id_ = token_of("bos_token");
    tokenizer->eos_id_ = token_of("eos_token");
  }
  return tokenizer;
}

std::vector<TokenId> Tokenizer::Encode(std::string_view input) const {
  std::string sanitized;
  std::string_view text = input;
  if (!IsValidUtf8(input)) {
    sanitized = DecodeLossy(input);
    text = sanitized;
  }
  std::vector<TokenId> ids;
  if (text.empty()) return ids;
  ids.reserve(text.size() / 3 + 4);
  std::vector<Segment> segments{{0, text.size(), kNoToken}};
  impl_->SplitAdded(text, impl_->raw_matcher, impl_->raw_tokens, segments);
  impl_->SplitAdded(text, impl_->normalized_matcher, impl_->normalized_tokens, segments);
  std::vector<std::string_view> pieces;
  for (const Segment& segment : segments) {
    if (segment.token != kNoToken) {
      ids.push_back(segment.token);
      continue;
    }
    pieces.clear();
    impl_->pre_tokenizer.Split(text.substr(segment.begin, segment.end - segment.begin), pieces);
    for (const std::string_view piece : pieces) impl_->EncodePiece(piece, ids);
  }
  return ids;
}

std::string Tokenizer::Decode(const std::vector<TokenId>& ids, bool skip_special_tokens) const {
  std::string bytes;
  for (const TokenId id : ids) {
    if (!IsKnown(id)) continue;
    if (skip_special_tokens && impl_->id_special[static_cast<size_t>(id)]) continue;
    bytes.append(impl_->id_bytes[static_cast<size_t>(id)]);
  }
  return DecodeLossy(bytes);
}

std::string_view Tokenizer::TokenBytes(TokenId id) const {
  if (!IsKnown(id)) return {};
  return impl_->id_bytes[static_cast<size_t>(id)];
}

bool Tokenizer::IsKnown(TokenId id) const {
  return id >= 0 && static_cast<size_t>(id) < impl_->id_known.size() && impl_->id_known[static_cast<size_t>(id)];
}

bool Tokenizer::IsSpecial(TokenId id) const { return IsKnown(id) && impl_->id_special[static_cast<size_t>(id)]; }

std::optional<std::string> Tokenizer::IdToToken(TokenId id) const {
  if (!IsKnown(id)) return std::nullopt;
  return impl_->id_string[static_cast<size_t>(id)];
}

std::optional<TokenId> Tokenizer::TokenToId(std::string_view token) const {
  if (const auto added = impl_->added_ids.find(AbslView(token)); added != impl_->added_ids.end()) {
    return added->second;
  }
  const auto it = impl_->vocab.find(AbslView(token));
  if (it == impl_->vocab.end()) return std::nullopt;
  return it->second;
}

size_t Tokenizer::vocab_size() const { return impl_->id_known.size(); }

const std::vector<AddedToken>& Tokenizer::added_tokens() const { return impl_->added; }

}  // namespace tandem::text
