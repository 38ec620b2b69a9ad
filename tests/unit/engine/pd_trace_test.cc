// pd_trace: a room's marks become the stages of its role's chain (the time between consecutive events that
// happened), only between Begin and Finish; a repeated mark keeps the last time.
#include "common/engine/pd_trace.h"

#include <gtest/gtest.h>

#include <map>
#include <string>
#include <vector>

namespace tandem::engine {
namespace {

struct Seen {
  EngineRole role = EngineRole::kMixed;
  std::vector<std::string> names;
  std::vector<double> seconds;
  int calls = 0;
};

class PdTraceTest : public ::testing::Test {
 protected:
  void SetUp() override {
    pd_trace::SetObserver([this](EngineRole role, std::span<const pd_trace::Stage> stages) {
      seen_.role = role;
      seen_.names.clear();
      seen_.seconds.clear();
      for (const auto& s : stages) {
        seen_.names.push_back(s.name);
        seen_.seconds.push_back(s.seconds);
      }
      ++seen_.calls;
    });
  }
  void TearDown() override { pd_trace::SetObserver({}); }
  Seen seen_;
};

TEST_F(PdTraceTest, StagesFollowTheChainAndSkipWhatDidNotHappen) {
  pd_trace::Begin(7, EngineRole::kDecode);
  pd_trace::Mark(7, "registered");
  pd_trace::Mark(7, "completion_arrived");
  pd_trace::Mark(7, "polled");
  pd_trace::Mark(7, "verified");
  pd_trace::Mark(7, "first_token");  // no "staged" nor "checked": the last stage spans from "verified"
  pd_trace::Finish(7);
  ASSERT_EQ(seen_.calls, 1);
  EXPECT_EQ(seen_.role, EngineRole::kDecode);
  EXPECT_EQ(seen_.names, (std::vector<std::string>{"registered", "completion_arrived", "polled", "verified", "first_token"}));
  for (double s : seen_.seconds) EXPECT_GE(s, 0.0);
}

TEST_F(PdTraceTest, OnlyOpenRoomsAreTracedAndFinishClosesThem) {
  pd_trace::Mark(8, "prompt_done");  // never begun: ignored
  pd_trace::Finish(8);
  EXPECT_EQ(seen_.calls, 0);
  pd_trace::Begin(8, EngineRole::kPrefill);
  pd_trace::Mark(8, "shipped");
  pd_trace::Mark(8, "shipped");  // the last chunk's ship replaces the first's
  pd_trace::Mark(8, "puts_done");
  pd_trace::Finish(8);
  ASSERT_EQ(seen_.calls, 1);
  EXPECT_EQ(seen_.role, EngineRole::kPrefill);
  EXPECT_EQ(seen_.names, (std::vector<std::string>{"shipped", "puts_done"}));
  pd_trace::Finish(8);  // already closed
  pd_trace::Mark(8, "acked");
  EXPECT_EQ(seen_.calls, 1);
}

}  // namespace
}  // namespace tandem::engine
