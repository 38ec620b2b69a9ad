// Xoshiro256: Normal() takes exactly one uniform pair per two normals (the generator's weights depend on
// the stream) and has the moments of a standard normal.
#include "common/core/random.h"

#include <cmath>

#include <gtest/gtest.h>

namespace tandem {
namespace {

TEST(RandomTest, NormalDrawsOneUniformPairPerTwoSamples) {
  Xoshiro256 normals(42), uniforms(42);
  for (int i = 0; i < 1000; ++i) {
    normals.Normal();
    normals.Normal();
    uniforms.Uniform();
    uniforms.Uniform();
    ASSERT_EQ(normals.Next(), uniforms.Next()) << "after pair " << i;
  }
}

TEST(RandomTest, NormalHasStandardMoments) {
  Xoshiro256 rng(7);
  double sum = 0, sum2 = 0;
  constexpr int kSamples = 200000;
  for (int i = 0; i < kSamples; ++i) {
    const double x = rng.Normal();
    ASSERT_TRUE(std::isfinite(x));
    sum += x;
    sum2 += x * x;
  }
  EXPECT_NEAR(sum / kSamples, 0.0, 0.01);
  EXPECT_NEAR(sum2 / kSamples, 1.0, 0.02);
}

}  // namespace
}  // namespace tandem
