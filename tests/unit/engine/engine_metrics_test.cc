// The engine's Prometheus gauges follow the load they are refreshed from: tandem_kv_quarantined_pages goes up
// while a failed transfer's pages are held back and down once they return.
#include <gtest/gtest.h>

#include <cmath>
#include <sstream>

#include "common/engine/server/engine_metrics.h"

namespace tandem::engine {
namespace {

// The value of the one sample of `name` in the exposition; NaN when it is missing.
double Sample(const std::string& exposition, const std::string& name) {
  std::istringstream lines(exposition);
  for (std::string line; std::getline(lines, line);) {
    if (line.rfind(name + "{", 0) == 0) return std::stod(line.substr(line.rfind(' ') + 1));
  }
  return std::nan("");
}

TEST(EngineMetrics, QuarantinedPagesGaugeGoesUpAndDownWithTheScheduler) {
  EngineMetrics metrics("tiny", "decode");
  EngineLoad load;
  EXPECT_EQ(Sample(metrics.Scrape(load), "tandem_kv_quarantined_pages"), 0);
  load.scheduler.quarantined_pages = 3;
  const std::string held = metrics.Scrape(load);
  EXPECT_EQ(Sample(held, "tandem_kv_quarantined_pages"), 3) << held;
  EXPECT_NE(held.find("# HELP tandem_kv_quarantined_pages"), std::string::npos);
  load.scheduler.quarantined_pages = 0;
  EXPECT_EQ(Sample(metrics.Scrape(load), "tandem_kv_quarantined_pages"), 0);
}

}  // namespace
}  // namespace tandem::engine
