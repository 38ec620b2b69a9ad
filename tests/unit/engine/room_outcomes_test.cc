// RoomOutcomes: outcomes are found until forgotten, and a late report for a room nobody polls any more
// (the scheduler forgot it when it aborted) does not stay forever.
#include "common/engine/server/room_outcomes.h"

#include <chrono>

#include <gtest/gtest.h>

namespace tandem::engine {
namespace {

using namespace std::chrono_literals;

struct FakeClock {
  RoomOutcomes::Clock::time_point now{};
  std::function<RoomOutcomes::Clock::time_point()> Fn() {
    return [this] { return now; };
  }
};

TEST(RoomOutcomesTest, FindsAnOutcomeUntilForgottenAndWakes) {
  int wakes = 0;
  FakeClock clock;
  RoomOutcomes outcomes([&] { ++wakes; }, 60s, clock.Fn(), 4);
  EXPECT_FALSE(outcomes.Find(7).has_value());
  outcomes.Callback()(7, absl::UnavailableError("prefill went away"));
  EXPECT_EQ(wakes, 1);
  ASSERT_TRUE(outcomes.Find(7).has_value());
  EXPECT_EQ(outcomes.Find(7)->code(), absl::StatusCode::kUnavailable);
  outcomes.Forget(7);
  EXPECT_FALSE(outcomes.Find(7).has_value());
}

TEST(RoomOutcomesTest, ALateReportForAForgottenRoomIsDroppedOnceOld) {
  FakeClock clock;
  RoomOutcomes outcomes({}, 60s, clock.Fn(), 4);
  auto report = outcomes.Callback();
  outcomes.Forget(1);  // the scheduler aborted room 1 and stopped polling it...
  report(1, absl::AbortedError("client went away"));  // ...then the agent reported its end
  EXPECT_EQ(outcomes.size(), 1u);
  clock.now += 30s;
  report(2, absl::OkStatus());
  report(3, absl::OkStatus());
  report(4, absl::OkStatus());  // the 4th report prunes: nothing is old enough yet
  EXPECT_EQ(outcomes.size(), 4u);
  clock.now += 31s;  // room 1's report is now 61 s old, rooms 2-4's 31 s
  for (uint64_t room = 5; room <= 8; ++room) report(room, absl::OkStatus());
  EXPECT_FALSE(outcomes.Find(1).has_value()) << "a report nobody will read must not stay forever";
  EXPECT_EQ(outcomes.size(), 7u);
  for (uint64_t room = 2; room <= 8; ++room) EXPECT_TRUE(outcomes.Find(room).has_value()) << room;
}

}  // namespace
}  // namespace tandem::engine
