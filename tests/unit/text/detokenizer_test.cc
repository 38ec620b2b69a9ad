#include "common/text/detokenizer.h"

#include <random>

#include <gtest/gtest.h>

#include "tests/unit/text/test_tokenizer.h"

namespace tandem::text {
namespace {

using testing::ByteToken;

std::vector<TokenId> Ids(const Tokenizer& tokenizer, std::initializer_list<const char*> pieces) {
  std::vector<TokenId> ids;
  for (const char* piece : pieces) {
    const auto id = tokenizer.TokenToId(BytesToTokenString(piece));
    EXPECT_TRUE(id.has_value()) << piece;
    ids.push_back(id.value_or(0));
  }
  return ids;
}

TEST(IncrementalDetokenizer, SplitEmojiStreamsWithoutReplacementChar) {
  TANDEM_REQUIRE_V4_TOKENIZER(tokenizer);
  IncrementalDetokenizer detokenizer(*tokenizer, true);
  std::string out;
  for (unsigned char byte : std::string("\xF0\x9F\x98\x80")) {
    const std::string piece = detokenizer.Push(ByteToken(*tokenizer, byte));
    EXPECT_EQ(piece.find("\xEF\xBF\xBD"), std::string::npos);
    out += piece;
    if (byte != 0x80) {
      EXPECT_TRUE(piece.empty());
    }
  }
  EXPECT_EQ(out, "😀");
  EXPECT_EQ(detokenizer.Finish(), "");
}

TEST(IncrementalDetokenizer, DanglingBytesFlushLossilyAtTheEnd) {
  TANDEM_REQUIRE_V4_TOKENIZER(tokenizer);
  IncrementalDetokenizer detokenizer(*tokenizer, true);
  EXPECT_EQ(detokenizer.Push(ByteToken(*tokenizer, 'a')), "a");
  EXPECT_EQ(detokenizer.Push(ByteToken(*tokenizer, 0xE2)), "");
  EXPECT_EQ(detokenizer.Push(ByteToken(*tokenizer, 0x82)), "");
  EXPECT_EQ(detokenizer.Finish(), "\xEF\xBF\xBD");
}

TEST(IncrementalDetokenizer, ConcatenationEqualsOneShotDecode) {
  TANDEM_REQUIRE_V4_TOKENIZER(tokenizer);
  std::mt19937 rng(5);
  for (int trial = 0; trial < 300; ++trial) {
    std::vector<TokenId> ids;
    const int length = 1 + static_cast<int>(rng() % 20);
    for (int i = 0; i < length; ++i) {
      ids.push_back(rng() % 3 == 0 ? static_cast<TokenId>(rng() % 129280) : static_cast<TokenId>(rng() % 300));
    }
    for (const bool skip : {false, true}) {
      IncrementalDetokenizer detokenizer(*tokenizer, skip);
      std::string streamed;
      for (const TokenId id : ids) streamed += detokenizer.Push(id);
      streamed += detokenizer.Finish();
      EXPECT_EQ(streamed, tokenizer->Decode(ids, skip));
    }
  }
}

TEST(StopStringMatcher, HoldsPrefixesAndTrimsTheMatch) {
  StopStringMatcher jail({"END"}, /*keep_matched=*/false);
  EXPECT_EQ(jail.Push("abc E").text, "abc ");
  EXPECT_EQ(jail.Push("N").text, "");
  const auto result = jail.Push("D tail");
  EXPECT_EQ(result.text, "");
  EXPECT_EQ(result.matched, 0u);
  EXPECT_TRUE(jail.stopped());
  EXPECT_EQ(jail.Push("more").text, "");
}

TEST(StopStringMatcher, ReleasesAHeldPrefixThatDoesNotComplete) {
  StopStringMatcher jail({"Elephant", "END"}, false);
  EXPECT_EQ(jail.Push("E").text, "");
  EXPECT_EQ(jail.Push("lse").text, "Else");
  EXPECT_EQ(jail.Push(" E").text, " ");
  EXPECT_EQ(jail.Finish(), "E");
}

TEST(StopStringMatcher, EarliestMatchWinsAndKeepMatchedKeepsIt) {
  StopStringMatcher jail({"world", "lo w"}, /*keep_matched=*/true);
  const auto result = jail.Push("hello world");
  EXPECT_EQ(result.matched, 1u);
  EXPECT_EQ(result.text, "hello w");
}

TEST(StreamDecoder, StopStringOverSingleLetterTokensNeverLeaks) {
  TANDEM_REQUIRE_V4_TOKENIZER(tokenizer);
  StreamDecoder decoder(*tokenizer, {.stop_strings = {"END"}});
  std::string streamed;
  for (const TokenId id : tokenizer->Encode("The")) streamed += decoder.Push(id).text;
  for (const TokenId id : Ids(*tokenizer, {" ", "E", "N"})) {
    const DecodeStep step = decoder.Push(id);
    EXPECT_FALSE(step.finished);
    streamed += step.text;
  }
  EXPECT_EQ(streamed, "The ");
  const DecodeStep last = decoder.Push(Ids(*tokenizer, {"D"})[0]);
  EXPECT_TRUE(last.finished);
  EXPECT_EQ(last.matched_string, "END");
  EXPECT_EQ(last.text, "");
  EXPECT_EQ(decoder.text(), "The ");
  EXPECT_TRUE(decoder.Push(19923).text.empty());
}

TEST(StreamDecoder, StopStringSpanningAMultiByteCharacter) {
  TANDEM_REQUIRE_V4_TOKENIZER(tokenizer);
  StreamDecoder decoder(*tokenizer, {.stop_strings = {"é!"}});
  std::string streamed;
  for (const TokenId id : tokenizer->Encode("caf")) streamed += decoder.Push(id).text;
  streamed += decoder.Push(ByteToken(*tokenizer, 0xC3)).text;
  EXPECT_EQ(streamed, "caf");
  streamed += decoder.Push(ByteToken(*tokenizer, 0xA9)).text;
  EXPECT_EQ(streamed, "caf");  // "é" is held: it may start the stop string
  const DecodeStep step = decoder.Push(ByteToken(*tokenizer, '!'));
  EXPECT_TRUE(step.finished);
  EXPECT_EQ(decoder.text(), "caf");
}

TEST(StreamDecoder, NoStopTrimKeepsTheStopString) {
  TANDEM_REQUIRE_V4_TOKENIZER(tokenizer);
  StreamDecoder decoder(*tokenizer, {.stop_strings = {"END"}, .no_stop_trim = true});
  decoder.Push(tokenizer->Encode("abc END def"));
  EXPECT_TRUE(decoder.finished());
  EXPECT_EQ(decoder.text(), "abc END");
}

TEST(StreamDecoder, EosIsHiddenAndReleasesHeldText) {
  TANDEM_REQUIRE_V4_TOKENIZER(tokenizer);
  StreamDecoder decoder(*tokenizer, {.stop_strings = {"END"}, .stop_token_ids = {1}, .skip_special_tokens = false});
  decoder.Push(tokenizer->Encode("Hello E"));
  EXPECT_EQ(decoder.text(), "Hello ");
  const DecodeStep step = decoder.Push(1);
  EXPECT_TRUE(step.finished);
  EXPECT_EQ(step.matched_token, 1);
  EXPECT_EQ(step.text, "E");
  EXPECT_EQ(decoder.text(), "Hello E");
  EXPECT_EQ(decoder.text().find("end▁of▁sentence"), std::string::npos);
}

TEST(StreamDecoder, FinishFlushesEverything) {
  TANDEM_REQUIRE_V4_TOKENIZER(tokenizer);
  StreamDecoder decoder(*tokenizer, {.stop_strings = {"ENDING"}});
  decoder.Push(tokenizer->Encode("x END"));
  decoder.Push(ByteToken(*tokenizer, 0xF0));
  EXPECT_EQ(decoder.text(), "x ");
  EXPECT_EQ(decoder.Finish(), "END\xEF\xBF\xBD");
  EXPECT_TRUE(decoder.finished());
}

}  // namespace
}  // namespace tandem::text
