// Config parsing: presets validate, the layer schedule is derived, and every error names its key.
#include "common/model/config.h"

#include <filesystem>
#include <fstream>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "common/model/generator.h"

namespace tandem::model {
namespace {

using ::testing::HasSubstr;

nlohmann::json TinyJson() { return ConfigToJson(*PresetConfig("tiny")); }

TEST(Config, TinyScheduleFollowsTheSpec) {
  auto c = ParseConfig(TinyJson());
  ASSERT_TRUE(c.ok()) << c.status();
  ASSERT_EQ(c->layers.size(), 5u);
  const int ratios[] = {0, 4, 128, 4, 0};
  const bool hashed[] = {true, true, false, false, false};
  for (int i = 0; i < 5; ++i) {
    EXPECT_EQ(c->layers[i].compress_ratio, ratios[i]) << i;
    EXPECT_EQ(c->layers[i].hash_routed, hashed[i]) << i;
  }
  EXPECT_TRUE(c->layers[4].is_mtp);
  EXPECT_EQ(c->vocab_size, 129280);
}

TEST(Config, FlashScheduleFromTheRealRatios) {
  auto doc = TinyJson();
  doc["num_hidden_layers"] = 43;
  std::vector<int> ratios = {0, 0};
  for (int i = 0; i < 20; ++i) ratios.insert(ratios.end(), {4, 128});
  ratios.insert(ratios.end(), {4, 0});
  doc["compress_ratios"] = ratios;
  doc["num_hash_layers"] = 3;
  auto c = ParseConfig(doc);
  ASSERT_TRUE(c.ok()) << c.status();
  int c4 = 0, c128 = 0, hashed = 0;
  for (const auto& l : c->layers) {
    if (l.is_mtp) continue;
    c4 += l.compress_ratio == 4;
    c128 += l.compress_ratio == 128;
    hashed += l.hash_routed;
  }
  EXPECT_EQ(c4, 21);
  EXPECT_EQ(c128, 20);
  EXPECT_EQ(hashed, 3);
  EXPECT_EQ(c->mtp_layer().compress_ratio, 0);
}

TEST(Config, MissingKeysAreNamed) {
  for (const char* key : {"hidden_size", "num_hidden_layers", "compress_ratios", "index_topk", "hc_mult",
                          "vocab_size", "swiglu_limit", "rope_theta"}) {
    auto doc = TinyJson();
    doc.erase(key);
    auto c = ParseConfig(doc);
    ASSERT_FALSE(c.ok()) << key;
    EXPECT_THAT(std::string(c.status().message()), HasSubstr(std::string("missing key ") + key));
  }
}

TEST(Config, InvalidValuesAreNamed) {
  struct Case {
    const char* key;
    nlohmann::json value;
    const char* expect;
  };
  const Case cases[] = {
      {"hidden_size", "256", "key hidden_size must be an integer"},
      {"hidden_size", -4, "key hidden_size must be >= 1"},
      {"num_key_value_heads", 2, "key num_key_value_heads must be 1"},
      {"o_groups", 3, "key o_groups must divide num_attention_heads"},
      {"index_head_dim", 96, "key index_head_dim must be a power of two"},
      {"expert_dtype", "int4", "key expert_dtype must be \"fp4\" or \"fp8\""},
      {"compress_ratios", nlohmann::json::array({0, 4, 128}), "key compress_ratios must have"},
      {"compress_ratios", nlohmann::json::array({0, 4, 7, 4, 0}), "key compress_ratios[2] must be 0, 4 or 128"},
      {"rms_norm_eps", 0, "key rms_norm_eps must be a positive number"},
      {"num_experts_per_tok", 9, "key num_experts_per_tok must be <= n_routed_experts"},
      {"hidden_act", "gelu", "key hidden_act must be \"silu\""},
  };
  for (const auto& tc : cases) {
    auto doc = TinyJson();
    doc[tc.key] = tc.value;
    auto c = ParseConfig(doc);
    ASSERT_FALSE(c.ok()) << tc.key;
    EXPECT_THAT(std::string(c.status().message()), HasSubstr(tc.expect));
  }
  auto doc = TinyJson();
  doc["rope_scaling"].erase("beta_fast");
  EXPECT_THAT(std::string(ParseConfig(doc).status().message()), HasSubstr("missing key rope_scaling.beta_fast"));
}

TEST(Config, LoadConfigNamesTheDirectory) {
  const std::string dir = ::testing::TempDir() + "/config_test_dir";
  std::filesystem::create_directories(dir);
  auto missing = LoadConfig(dir + "/nope");
  EXPECT_THAT(std::string(missing.status().message()), HasSubstr("config.json missing"));
  std::ofstream(dir + "/config.json") << "{ not json";
  EXPECT_THAT(std::string(LoadConfig(dir).status().message()), HasSubstr("not valid JSON"));
  std::filesystem::remove_all(dir);
}

TEST(Config, RoundTripsThroughJson) {
  for (const char* preset : {"tiny", "small", "flash-layer"}) {
    auto c = PresetConfig(preset);
    ASSERT_TRUE(c.ok()) << preset;
    auto again = ParseConfig(ConfigToJson(*c));
    ASSERT_TRUE(again.ok());
    EXPECT_EQ(ConfigToJson(*again), ConfigToJson(*c)) << preset;
  }
}

}  // namespace
}  // namespace tandem::model
