#include "common/metrics/metrics.h"

#include <prometheus/text_serializer.h>

namespace tandem::metrics {

const std::vector<double>& TtftBuckets() {
  static const std::vector<double> buckets = {0.1, 0.2, 0.4, 0.6, 0.8, 1, 2, 4, 6, 8, 10, 20, 40, 60, 80, 100, 200, 400};
  return buckets;
}

const std::vector<double>& InterTokenBuckets() {
  static const std::vector<double> buckets = {0.002, 0.004, 0.006, 0.008, 0.01, 0.015, 0.02, 0.025, 0.03, 0.035, 0.04, 0.06,
                                              0.08,  0.1,   0.2,   0.4,   0.6,  0.8,   1,    2,     4,    6,     8};
  return buckets;
}

const std::vector<double>& E2eBuckets() {
  static const std::vector<double> buckets = {0.1, 0.2, 0.4, 0.6, 0.8, 1, 2, 4, 6, 8, 10, 20, 40, 60, 80, 100, 200, 400, 800, 1200, 2400};
  return buckets;
}

const std::vector<double>& QueueTimeBuckets() {
  static const std::vector<double> buckets = {0.0, 0.1, 0.2, 0.5, 1, 2, 3, 4, 5, 10, 15, 20, 30, 40, 50, 60, 70, 80, 90, 100,
                                              200, 300, 400, 500, 600, 700, 800, 900, 1000, 1200, 1400, 1600, 1800, 2000, 2500, 3000};
  return buckets;
}

std::string Exposition(const prometheus::Registry& registry) {
  return prometheus::TextSerializer().Serialize(registry.Collect());
}

}  // namespace tandem::metrics
