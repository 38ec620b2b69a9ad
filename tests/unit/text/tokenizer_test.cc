#include "common/text/tokenizer.h"

#include <thread>

#include <gtest/gtest.h>

#include "common/text/utf8.h"
#include "tests/unit/text/test_tokenizer.h"

namespace tandem::text {
namespace {

TEST(Utf8, LossyDecodingReplacesMaximalSubparts) {
  EXPECT_EQ(DecodeLossy("abc"), "abc");
  EXPECT_EQ(DecodeLossy("a\xF0\x9F\x98"), "a\xEF\xBF\xBD");                  // truncated at end: one
  EXPECT_EQ(DecodeLossy("\xE0\x80x"), "\xEF\xBF\xBD\xEF\xBF\xBDx");         // bad second byte: two
  EXPECT_EQ(DecodeLossy("\xE2\x82" "A"), "\xEF\xBF\xBD" "A");               // valid prefix cut: one
  EXPECT_EQ(DecodeLossy("\xED\xA0\x80"), "\xEF\xBF\xBD\xEF\xBF\xBD\xEF\xBF\xBD");  // surrogate
  EXPECT_EQ(DecodeLossy("\xFF\xFE"), "\xEF\xBF\xBD\xEF\xBF\xBD");
  EXPECT_EQ(DecodeLossy("\xF0\x9F\x98\x80"), "\xF0\x9F\x98\x80");
}

TEST(Utf8, IncompleteTailIsOnlyAProperPrefixOfAValidCharacter) {
  EXPECT_EQ(IncompleteTailLength("ab\xF0\x9F"), 2u);
  EXPECT_EQ(IncompleteTailLength("ab\xF0\x9F\x98"), 3u);
  EXPECT_EQ(IncompleteTailLength("ab\xF0\x9F\x98\x80"), 0u);
  EXPECT_EQ(IncompleteTailLength("\xE2"), 1u);
  EXPECT_EQ(IncompleteTailLength("\x80\x80"), 0u);   // stray continuations can never complete
  EXPECT_EQ(IncompleteTailLength("\xE0\x80"), 0u);   // already invalid
  EXPECT_EQ(IncompleteTailLength(""), 0u);
}

TEST(Tokenizer, PackageExampleMatchesHf) {
  TANDEM_REQUIRE_V4_TOKENIZER(tokenizer);
  const std::vector<TokenId> expected = {19923, 3, 223, 5464, 5008, 1175, 19, 940, 223, 19, 438, 223, 20,
                                         6113, 257, 76589, 131, 100, 76032, 1628, 76589, 131, 108, 76589, 131, 98};
  const std::string text = "Hello! 毕老师！1 + 1 = 2 ĠÑĤÐ²ÑĬÑĢ";
  EXPECT_EQ(tokenizer->Encode(text), expected);
  EXPECT_EQ(tokenizer->Decode(expected), text);
}

TEST(Tokenizer, SpecialTokenIdsAndConfig) {
  TANDEM_REQUIRE_V4_TOKENIZER(tokenizer);
  EXPECT_EQ(tokenizer->TokenToId("<think>"), 128821);
  EXPECT_EQ(tokenizer->TokenToId("</think>"), 128822);
  EXPECT_EQ(tokenizer->TokenToId("｜DSML｜"), 128825);
  EXPECT_EQ(tokenizer->TokenToId("<｜latest_reminder｜>"), 128828);
  EXPECT_EQ(tokenizer->bos_id(), 0);
  EXPECT_EQ(tokenizer->eos_id(), 1);
  EXPECT_TRUE(tokenizer->IsSpecial(0));
  EXPECT_FALSE(tokenizer->IsSpecial(128821));  // <think> survives skip_special_tokens
  EXPECT_EQ(tokenizer->vocab_size(), 129280u);
}

TEST(Tokenizer, ChatPromptHasOneBosFirst) {
  TANDEM_REQUIRE_V4_TOKENIZER(tokenizer);
  const auto ids = tokenizer->Encode("<｜begin▁of▁sentence｜><｜User｜>Hello<｜Assistant｜></think>");
  ASSERT_GE(ids.size(), 3u);
  EXPECT_EQ(ids[0], 0);
  EXPECT_EQ(ids[1], 128803);
  EXPECT_EQ(std::count(ids.begin(), ids.end(), 0), 1);
  EXPECT_NE(std::find(ids.begin(), ids.end(), 128804), ids.end());
  EXPECT_EQ(ids.back(), 128822);
  EXPECT_TRUE(tokenizer->Encode("").empty());
}

TEST(Tokenizer, RoundTripsText) {
  TANDEM_REQUIRE_V4_TOKENIZER(tokenizer);
  for (const std::string text : {"plain text", "  leading spaces\n\n\ttabs\r\n", "中文和日本語のテキスト",
                                 "👨‍👩‍👧‍👦 family", "12345678901234567890", "<think>x</think>y",
                                 "a\xC2\xA0" "b\xE3\x80\x80" "c"}) {
    EXPECT_EQ(tokenizer->Decode(tokenizer->Encode(text)), text) << text;
  }
}

TEST(Tokenizer, MalformedInputIsReadLossily) {
  TANDEM_REQUIRE_V4_TOKENIZER(tokenizer);
  EXPECT_EQ(tokenizer->Encode("a\xFF" "b"), tokenizer->Encode("a\xEF\xBF\xBD" "b"));
}

TEST(Tokenizer, DecodeSkipsSpecialsAndUnknownIds) {
  TANDEM_REQUIRE_V4_TOKENIZER(tokenizer);
  std::vector<TokenId> ids = {0, 19923, 1, 128821, -5, 99999999};
  EXPECT_EQ(tokenizer->Decode(ids, /*skip_special_tokens=*/true), "Hello<think>");
  EXPECT_EQ(tokenizer->Decode(ids), "<｜begin▁of▁sentence｜>Hello<｜end▁of▁sentence｜><think>");
}

TEST(Tokenizer, EncodeIsThreadSafe) {
  TANDEM_REQUIRE_V4_TOKENIZER(tokenizer);
  std::vector<std::string> texts;
  for (int i = 0; i < 200; ++i) {
    texts.push_back("request " + std::to_string(i * 7919) + " 中文 テキスト  \n\t" + std::string(static_cast<size_t>(i % 13), ' ') +
                    "word" + std::to_string(i) + " <think>x</think>");
  }
  std::vector<std::vector<TokenId>> expected;
  for (const auto& text : texts) expected.push_back(tokenizer->Encode(text));
  std::vector<std::thread> threads;
  std::vector<int> mismatches(4, 0);
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      for (int round = 0; round < 5; ++round) {
        for (size_t i = 0; i < texts.size(); ++i) mismatches[t] += tokenizer->Encode(texts[i]) != expected[i];
      }
    });
  }
  for (auto& thread : threads) thread.join();
  EXPECT_EQ(mismatches, std::vector<int>(4, 0));
}

TEST(Tokenizer, LoadErrorsNameThePath) {
  auto missing = Tokenizer::Load("/nonexistent/model");
  ASSERT_FALSE(missing.ok());
  EXPECT_NE(missing.status().message().find("/nonexistent/model"), std::string_view::npos);
  EXPECT_FALSE(Tokenizer::FromJsonText("{not json", "").ok());
  EXPECT_FALSE(Tokenizer::FromJsonText(R"({"model": {"type": "WordPiece"}})", "").ok());
  EXPECT_FALSE(Tokenizer::FromJsonText(
                   R"({"model": {"type": "BPE", "vocab": {"a": 0}, "merges": ["a b"]}})", "")
                   .ok());
}

// A hand-made vocabulary: checks merge order (lowest rank first, leftmost on ties) and the heap
// path used for long pieces.
TEST(Tokenizer, MergesLowestRankFirstOnShortAndLongPieces) {
  const std::string json = R"({
    "model": {"type": "BPE", "vocab": {"a": 0, "b": 1, "ab": 2, "ba": 3, "aab": 4, "aa": 5},
              "merges": ["a b", "a a", "b a", "a ab"]},
    "added_tokens": [{"id": 6, "content": "<x>", "special": true}]
  })";
  auto tokenizer = Tokenizer::FromJsonText(json, "");
  ASSERT_TRUE(tokenizer.ok()) << tokenizer.status();
  EXPECT_EQ((*tokenizer)->Encode("aab"), (std::vector<TokenId>{4}));     // a+b first, then a+ab
  EXPECT_EQ((*tokenizer)->Encode("aaa"), (std::vector<TokenId>{5, 0}));  // leftmost pair on a tie
  EXPECT_EQ((*tokenizer)->Encode("b<x>a"), (std::vector<TokenId>{1, 6, 0}));
  std::string long_text;
  std::vector<TokenId> expected;
  for (int i = 0; i < 200; ++i) {
    long_text += "aab";
    expected.push_back(4);
  }
  EXPECT_EQ((*tokenizer)->Encode(long_text), expected);
}

}  // namespace
}  // namespace tandem::text
