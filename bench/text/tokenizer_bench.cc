// Single-thread throughput of the text layer on a JSON-lines corpus (one JSON string per line):
// encode, decode and streaming detokenization. Prints one JSON object; bench_tokenizer.py drives
// it next to HF `tokenizers` and writes the CSV and plot.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "common/text/detokenizer.h"
#include "common/text/dsml_parser.h"
#include "common/text/tokenizer.h"

namespace {

using Clock = std::chrono::steady_clock;
using tandem::text::TokenId;

double Seconds(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

// Median over `passes` timed runs of `body` (after one untimed warm-up run).
template <typename Body>
double MedianSeconds(int passes, Body&& body) {
  body();
  std::vector<double> times;
  for (int i = 0; i < passes; ++i) {
    const auto start = Clock::now();
    body();
    times.push_back(Seconds(start));
  }
  std::sort(times.begin(), times.end());
  return times[times.size() / 2];
}

// Streaming DSML parse of one tool call whose string argument has `words` words, fed in chunks
// of 4 bytes (about a token): seconds per Push. The parser rescans the open call on every Push,
// so the cost per Push grows with the call's length; this row tracks that.
double DsmlSecondsPerPush(int words, size_t& bytes) {
  std::string value;
  for (int i = 0; i < words; ++i) value += "word" + std::to_string(i % 10) + " ";
  const std::string text = "Sure.\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"write\">\n"
                           "<｜DSML｜parameter name=\"content\" string=\"true\">" + value +
                           "</｜DSML｜parameter>\n</｜DSML｜invoke>\n</｜DSML｜tool_calls>";
  bytes = text.size();
  size_t pushes = 0;
  const double seconds = MedianSeconds(3, [&] {
    tandem::text::DsmlToolParser parser;
    pushes = 0;
    for (size_t i = 0; i < text.size(); i += 4, ++pushes) parser.Push(std::string_view(text).substr(i, 4));
    parser.Finish();
  });
  return seconds / static_cast<double>(pushes);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 3) {
    std::cerr << "usage: tandem-text-bench TOKENIZER_DIR CORPUS.jsonl [PASSES]\n";
    return 2;
  }
  const int passes = argc > 3 ? std::max(1, std::atoi(argv[3])) : 5;
  auto loaded = tandem::text::Tokenizer::Load(argv[1]);
  if (!loaded.ok()) {
    std::cerr << "tandem-text-bench: " << loaded.status().message() << "\n";
    return 1;
  }
  std::ifstream in(argv[2]);
  if (!in) {
    std::cerr << "tandem-text-bench: cannot open " << argv[2] << "\n";
    return 1;
  }
  std::vector<std::string> texts;
  size_t bytes = 0;
  for (std::string line; std::getline(in, line);) {
    const auto value = nlohmann::json::parse(line, nullptr, false);
    if (!value.is_string()) continue;
    texts.push_back(value.get<std::string>());
    bytes += texts.back().size();
  }

  // Cold: one pass on a freshly loaded tokenizer, before its piece cache holds anything.
  std::vector<std::vector<TokenId>> ids(texts.size());
  const auto cold_start = Clock::now();
  for (size_t i = 0; i < texts.size(); ++i) ids[i] = (*loaded)->Encode(texts[i]);
  const double encode_cold_s = Seconds(cold_start);
  const tandem::text::Tokenizer& tokenizer = **loaded;

  size_t tokens = 0;
  const double encode_s = MedianSeconds(passes, [&] {
    tokens = 0;
    for (size_t i = 0; i < texts.size(); ++i) {
      ids[i] = tokenizer.Encode(texts[i]);
      tokens += ids[i].size();
    }
  });
  size_t decoded_bytes = 0;
  const double decode_s = MedianSeconds(passes, [&] {
    decoded_bytes = 0;
    for (const auto& list : ids) decoded_bytes += tokenizer.Decode(list).size();
  });
  const double stream_s = MedianSeconds(passes, [&] {
    for (const auto& list : ids) {
      tandem::text::IncrementalDetokenizer detokenizer(tokenizer, true);
      for (const TokenId id : list) decoded_bytes += detokenizer.Push(id).size();
      decoded_bytes += detokenizer.Finish().size();
    }
  });
  const double stream_stop_s = MedianSeconds(passes, [&] {
    for (const auto& list : ids) {
      tandem::text::StreamDecoder decoder(tokenizer, {.stop_strings = {"<|im_end|>", "\n\nUser:"}, .stop_token_ids = {1}});
      for (const TokenId id : list) decoded_bytes += decoder.Push(id).text.size();
      decoded_bytes += decoder.Finish().size();
    }
  });
  size_t dsml_small_bytes = 0;
  size_t dsml_large_bytes = 0;
  const double dsml_small = DsmlSecondsPerPush(300, dsml_small_bytes);
  const double dsml_large = DsmlSecondsPerPush(6000, dsml_large_bytes);
  nlohmann::json out = {{"texts", texts.size()},
                        {"bytes", bytes},
                        {"tokens", tokens},
                        {"encode_s", encode_s},
                        {"encode_cold_s", encode_cold_s},
                        {"decode_s", decode_s},
                        {"stream_detokenize_s", stream_s},
                        {"stream_with_stops_s", stream_stop_s},
                        {"dsml_push_s_small", dsml_small},
                        {"dsml_small_bytes", dsml_small_bytes},
                        {"dsml_push_s_large", dsml_large},
                        {"dsml_large_bytes", dsml_large_bytes},
                        {"checksum", decoded_bytes % 1000}};
  std::cout << out.dump() << "\n";
  return 0;
}
