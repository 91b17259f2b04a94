#include "transport/transport.h"

#include <cstdint>
#include <random>
#include <string>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "testing/status_matchers.h"

namespace kvx::transport {
namespace {

using ::kvx::testing::StatusIs;

TEST(RegionDescriptorTest, RoundTripsExtremeValues) {
  const RegionDescriptor cases[] = {
      {0, 0, 0},
      {1, 2, 3},
      {~uint64_t{0}, ~uint64_t{0}, ~uint64_t{0}},
      {0x0102030405060708, 0x1112131415161718, 0x2122232425262728},
  };
  for (const RegionDescriptor& d : cases) {
    SCOPED_TRACE(absl::StrCat("address=", d.address, " length=", d.length, " key=", d.key));
    const std::string bytes = EncodeRegionDescriptor(d);
    EXPECT_EQ(bytes.size(), kEncodedRegionDescriptorBytes);
    ASSERT_OK_AND_ASSIGN(RegionDescriptor back, DecodeRegionDescriptor(bytes));
    EXPECT_EQ(back, d);
  }
}

TEST(RegionDescriptorTest, EncodingIsLittleEndianAndVersioned) {
  const std::string bytes = EncodeRegionDescriptor({0x0102, 0, 0});
  EXPECT_EQ(bytes.substr(0, 4), "KVXR");
  EXPECT_EQ(bytes[4], static_cast<char>(kRegionDescriptorVersion));
  EXPECT_EQ(bytes[5], 0x02);
  EXPECT_EQ(bytes[6], 0x01);
}

TEST(RegionDescriptorTest, MalformedBytesAreRefused) {
  const std::string good = EncodeRegionDescriptor({1, 2, 3});
  std::string bad_magic = good;
  bad_magic[0] = 'X';
  std::string bad_version = good;
  bad_version[4] = 9;
  const struct {
    const char* name;
    std::string bytes;
  } cases[] = {
      {"empty", ""},
      {"short", good.substr(0, good.size() - 1)},
      {"long", good + "x"},
      {"magic", bad_magic},
      {"version", bad_version},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(c.name);
    EXPECT_THAT(DecodeRegionDescriptor(c.bytes), StatusIs(absl::StatusCode::kInvalidArgument));
  }
}

TEST(RegionDescriptorTest, RandomBytesNeverCrash) {
  const uint32_t seed = ::testing::UnitTest::GetInstance()->random_seed();
  SCOPED_TRACE(absl::StrCat("seed=", seed));
  std::mt19937 rng(seed);
  for (int i = 0; i < 10000; ++i) {
    std::string bytes(rng() % 40, '\0');
    for (char& c : bytes) c = static_cast<char>(rng());
    if (i % 2 == 0 && bytes.size() >= 5) bytes.replace(0, 5, "KVXR\x01");
    (void)DecodeRegionDescriptor(bytes);
  }
}

}  // namespace
}  // namespace kvx::transport
